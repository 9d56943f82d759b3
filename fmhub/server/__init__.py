"""`fmhub server`: a self-hosted git + Git LFS server that enforces the access policy (docs/server.md).

Layers, lowest first; each module imports only those above it in this list:

* `tokens`    who is asking: hashed tokens, constant-time lookup;
* `repos`     which bare repositories the root holds, their protected branches;
* `uploads`   who uploaded which object (proof of possession);
* `index`     which objects the manifests at each ref name, and the policy at each protected ref;
* `guard`     the decisions: may this user read this object, is this user an admin; audited;
* `receive`   the checks a push must pass before its refs move;
* `packguard` the sizes a pushed pack declares, checked before dulwich inflates them;
* `lfs`       the Git LFS API: giftless with fmhub's identity and verified storage;
* `git_http`  git's smart HTTP protocol: dulwich's WSGI application with the push checks;
* `app`       the WSGI application that authenticates and routes every request;
* `gate`      waitress's connections: bodies admitted before they are read, deadlines, eviction at the limit;
* `serve`     waitress serving it (``fmhub server``), with the limits `gate` enforces.

May import (as a layer): `fmhub.base`, `fmhub.project`, `fmhub.plugin`, `fmhub.core`, `fmhub.governance`, `fmhub.git`.
"""
