"""DiffSynth Studio, disk-cache edition."""
__version__ = "0.1.0"
