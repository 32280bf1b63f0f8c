"""What crosses process boundaries, in one place: the event envelope, topic names, the GPU task,
the callback body and its signature, the S3 key layout, the edit vocabulary.

Pure data and pure functions (no I/O): the API, relay, projectors, dispatcher and GPU worker all
import these modules and nothing else of each other (ARCHITECTURE §8, layering).
"""
