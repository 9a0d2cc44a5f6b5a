"""The leaf of the package tree (torch only, nothing of infinikv but its errors): the model
config, rotary-embedding maths, partial attention results and their merge, and the
reference Self-Extend maths that every attention backend and kernel is tested against."""
