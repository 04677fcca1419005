"""The built-in shapes: `default` is what `matrixstack up` runs when no shape is given."""
