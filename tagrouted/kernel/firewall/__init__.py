"""The firewall edge: one interface the converger calls, one module per backend."""
