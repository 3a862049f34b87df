"""The embedded local stack: its processes, their guard, the MMP_HOME file lock and the demo."""
