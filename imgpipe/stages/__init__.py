"""One module per rule file: each exposes the run_<rule> its script calls."""
