"""Triggers: deferrable waits that hold no worker slot."""
