#!/usr/bin/env bash
# System packages some tests need: Java (pycocoevalcap METEOR/CIDEr tokeniser), Chromium (report and
# web page screenshots), WordNet. Installs only what is missing; never fails the build when it cannot
# install (the tests that need a missing tool skip and say why; with CI=true they fail instead:
# tests/fixtures.py skip_missing).
set -u
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
      >/tmp/medcap-apt.log 2>&1 || echo "warning: could not install ${need[*]} (see /tmp/medcap-apt.log); tests that need them will skip (fail with CI=true)"
  else
    echo "note: missing ${need[*]}; install them to run every test (tests that need them will skip, or fail with CI=true)"
  fi
fi
exit 0
