"""Persistence: SQLAlchemy models, sessions, migrations, and the data-access functions."""
