import sys

from greyproxy.cli import main

main(["run", "maintenance", *sys.argv[1:]])
