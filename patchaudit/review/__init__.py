"""Review pages: one self-contained index.html per report (data -> svg charts -> page)."""
