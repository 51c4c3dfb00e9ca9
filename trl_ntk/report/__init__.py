"""The self-contained HTML report of one run folder."""
