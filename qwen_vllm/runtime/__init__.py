"""Process runtime: processes that die with their parent, free ports, and the
CPU backend's defaults."""
