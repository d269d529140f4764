from flashllm.cli import app

app()
