"""MatrixStack: a shaped compute fabric first, a model catalog second.

Layers, bottom to top: fabric, arch -> matrix, perf -> openai, engine, lanes -> portal -> stack -> cli.
"""

__version__ = "0.1.0"
