"""A run's report: tables, figures and the HTML page."""
