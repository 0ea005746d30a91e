for i in 1 2 3; do for k in 8 1 2; do
molink-lite bench --concurrency 16 --delay-ms 10 --rate-mbit 100 --speculative auto --spec-k $k --workdir /tmp/s10/ab_wd --json /tmp/s10/ab_${k}_$i.json > /tmp/s10/ab_${k}_$i.log 2>&1
echo "k=$k run $i: $(grep -E 'speculation on / off' /tmp/s10/ab_${k}_$i.log) $(grep -E '^ +(molink|spec) c=16' /tmp/s10/ab_${k}_$i.log | awk '{print $3}' | tr '\n' ' ')"
done; done
