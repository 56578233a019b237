"""What imports torch: the sweep runner, its worker processes and what they measure with."""
