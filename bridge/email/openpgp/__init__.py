"""OpenPGP for the email leg: Autocrypt keys, peer state and PGP/MIME. Pure library, no I/O.

keys.py is the only module that imports the OpenPGP engine (rpgp-py); autocrypt.py holds the
Autocrypt Level 1 header format and peer-state rules; pgpmime.py composes and parses RFC 3156
mail. Nothing here touches the database or the network.
"""
