"""Load generator, workloads and reports for bertserve. Measures and writes; never asserts timings."""
