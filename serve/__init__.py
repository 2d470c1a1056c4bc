"""zooserve's server: registry entries become engines, engines become HTTP."""

__version__ = "0.1.0"
