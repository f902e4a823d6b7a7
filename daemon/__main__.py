from daemon.cli import main

# Guarded: a worker process started with "spawn" imports the main module again, and must not
# start a second miner.
if __name__ == "__main__":
    main()
