"""What every layer uses: errors, atomic file writes and tables, logs, charts."""
