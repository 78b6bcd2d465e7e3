"""Database access: the ORM schema (tables) and engine/session handling (engine)."""
