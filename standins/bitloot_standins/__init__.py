"""Stand-ins for the outside systems: real HTTP servers on 127.0.0.1 speaking the real protocols."""
