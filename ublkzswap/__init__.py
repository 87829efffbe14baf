"""ublkzswap: compcache 0.6 (ramzswap) served from userspace through Linux ublk.

See DESIGN in the repository's README for the module map.
"""

__version__ = "0.1.0"
