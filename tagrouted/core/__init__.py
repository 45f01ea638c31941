"""The pure core: config -> desired state -> plan and diff. No I/O, no kernel library imports."""
