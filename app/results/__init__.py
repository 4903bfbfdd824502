"""What the service keeps and sends: the results database (results, intake) and their delivery
to a PACS (STOW-RS or C-STORE, retried)."""
