"""The Redis stores: batch bytes, dead letters, counters and locks.

They sit between the ground floor (record, codec, config, errors) and everything that moves
batches (the reporter's transports, the pumps' host, the tasks, the command line), and import
only the ground floor. Each store takes a ``redis.Redis`` client in its constructor: nothing here
opens a connection by itself.
"""
