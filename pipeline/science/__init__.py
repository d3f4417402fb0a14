"""Pure functions over arrays (statistics, operator fits, image metrics): no I/O."""
