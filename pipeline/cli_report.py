"""`pipeline report`, `pipeline predict-image`, `pipeline submit`: registered on the main app."""
