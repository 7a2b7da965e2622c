import sys

from greyproxy.cli import main

main(["run", "recorder", *sys.argv[1:]])
