"""The Responses API on the queue: the request turned into a chat job, the chat job's events turned into the Responses API's."""
