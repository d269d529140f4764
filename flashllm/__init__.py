"""flashllm: run language models larger than DRAM by streaming FFN neurons from flash."""

import os

# torch's OpenMP threads spin while they wait for work by default. On a machine whose cores are busy with
# other work (CI, a second model, our own flash reader threads) a spinning thread holds a core that the
# thread doing the work needs: measured with the 2 cores busy, an int8 -> float32 copy took 11.0 ms with
# spinning threads against 0.48 ms with passive ones, the int4 kernel 7.6 ms against 3.1 ms, and an idle
# machine shows no loss. Read by OpenMP when it loads, so only effective when flashllm is imported before
# torch (the CLI always is); the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
