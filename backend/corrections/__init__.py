"""The corrections log: events → entries → records (journal-spooled), and its exports."""
