"""Local training and client-side defences; importing the package registers the built-in
defences (`fedsim.training.defences`) in the transformation registry, so their names exist
wherever the registry is read."""

from fedsim.training import defences as defences
