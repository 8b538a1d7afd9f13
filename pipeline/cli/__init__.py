"""The command-line layer: parse options, call the library, print. No library code lives here."""
