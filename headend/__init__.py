"""Lipari host side: head-end, virtual meter runner, command line."""
import os

# The repository root: firmware/, boards/ and sim/ are found relative to it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
