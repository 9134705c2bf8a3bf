"""The release format the builder writes and the agent reads: versions, the release manifest, the
signed channel manifest, and a machine's place in the rollout waves.

Standard library only, and nothing from the rest of `updater` but `errors` and `files`: the
builder imports these modules on a build host, the agent on a device with the image's own Python.
"""
