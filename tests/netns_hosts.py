"""Test hosts for tests/test_destinations.py, run inside a network namespace of the test's own:
a TCP echo server on every address of the namespace, port 7, that appends the address each
connection reached to the file named by its argument (one line per connection)."""

import socket
import sys
import threading


def serve(listener: socket.socket, log_path: str) -> None:
    while True:
        connection, _ = listener.accept()
        with open(log_path, "a") as log:
            log.write(connection.getsockname()[0] + "\n")
        threading.Thread(target=echo, args=(connection,), daemon=True).start()


def echo(connection: socket.socket) -> None:
    with connection:
        while data := connection.recv(65536):
            connection.sendall(data)


if __name__ == "__main__":
    listener = socket.create_server(("0.0.0.0", 7))
    print("listening", flush=True)
    serve(listener, sys.argv[1])
