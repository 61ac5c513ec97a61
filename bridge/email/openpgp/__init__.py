"""OpenPGP for the email leg: Autocrypt keys, peer state and PGP/MIME. No database, no network.

- keys.py: the only module that imports the OpenPGP engine (rpgp-py): keys, encrypt+sign,
  decrypt+verify, detached signatures;
- autocrypt.py: the Autocrypt Level 1 header, the peer-state update and recommendation rules,
  and the shapes to store (MailboxKey, PeerState);
- pgpmime.py: RFC 3156 mail with protected headers, composed and opened;
- sandbox.py: open_mail in a worker process with memory and time limits (the engine holds the
  GIL and decompresses without a cap: inbound mail should go through it);
- vcard.py: the contact card Delta Chat imports.
"""
