"""Result tables, statistics and figures, from measured metrics and logs only (no torch)."""
