"""The vocabulary shared by the NumPy reference and the cuDNN path: modes, layouts, input checks,
saved statistics, the mode policy and the tolerances. Imports nothing above itself."""
