"""Tools a site runs against a running service (clients, no models of their own)."""
