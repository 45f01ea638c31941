"""The daemon: scheduling (one reconcile worker), event sources, the control socket, the journal.
Kept import-free: `tagroutectl status` imports only `daemon.control` from here."""
