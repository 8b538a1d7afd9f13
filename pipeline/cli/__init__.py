"""Click commands. Each is a thin layer: parse options, call pipeline/, print."""
