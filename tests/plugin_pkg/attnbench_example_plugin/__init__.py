"""An attnbench plugin; importing ``attnbench_example_plugin.chunked`` registers ``chunked``."""
