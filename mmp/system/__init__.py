"""What MMP asks of the operating system, for every layer: file locks, process trees, and a guard that stops children with their parent."""
