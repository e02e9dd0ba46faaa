"""What people look at: the dashboard (HTTP, static page) and the highlight archive."""
