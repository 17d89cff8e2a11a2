"""Schemathesis hooks for the API fuzz run (loaded through SCHEMATHESIS_HOOKS).

Every valid user id the fuzzer makes up would be a new sandbox (a container each); the pool would
fill and answer 503, which is the truth but not what the run is for. Valid ids are mapped onto two
users; invalid ones go through untouched, to be refused."""

import random
import re

import schemathesis

USER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
USERS = ("fuzz-a", "fuzz-b")


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    user = path_parameters.get("user") if path_parameters else None
    if isinstance(user, str) and USER.fullmatch(user):
        path_parameters["user"] = random.choice(USERS)
    return path_parameters
