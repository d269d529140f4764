"""The on-flash format: format (schema, record layout), reader (Bundle, open_model), writer (convert),
verify (verify, info)."""
