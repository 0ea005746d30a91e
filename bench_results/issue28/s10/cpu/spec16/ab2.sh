for i in 1 2 3; do
molink-lite bench --concurrency 1,16 --delay-ms 10 --rate-mbit 100 --speculative auto --workdir /tmp/s10/ab_wd --json /tmp/s10/mg_$i.json > /tmp/s10/mg_$i.log 2>&1
echo "margin run $i: $(grep -E 'speculation on / off' /tmp/s10/mg_$i.log | tr '\n' ' ') $(grep -E '^ +(molink|spec) c=' /tmp/s10/mg_$i.log | awk '{print $1, $2, $3}' | tr '\n' ' ')"
done
