"""Collect results/decode_*.txt into one markdown table (ms median/min, effective GB/s over the
*unique* chosen-expert bytes + attention bytes, fraction of the interleaved reference matvec)."""
import glob, re, sys
MB = {1: 705e6, 4: 1850e6, 16: 2819e6}   # unique chosen-expert bytes per step (from the runs)
ATT = 67e6
rows = {}
import os
for f in sorted(glob.glob('results/decode_*.txt'), key=os.path.getmtime):
    for line in open(f):
        p = line.split()
        if len(p) > 12 and re.match(r'^[a-z]_|^[a-z]\w+$', p[0]) and p[1].isdigit():
            try:
                name, B, med, mn, refbw, busy = p[0], int(p[1]), float(p[2]), float(p[3]), float(p[6]), float(p[10])
            except ValueError:
                continue
            copies = line.split('attn-slice copies:')[1].split('|')[1].strip() if 'attn-slice' in line else ''
            old = rows.setdefault(name, {}).get(B)
            if old is None or not (busy > 0.5 and old[3] <= 0.5):   # keep the latest quiet run
                rows[name][B] = (med, mn, refbw, busy, copies)
names = sorted(rows, key=lambda n: rows[n].get(1, (1e9,))[0])
print('| variant | B=1 ms (min) | B=1 GB/s | B=4 ms (min) | B=4 GB/s | B=16 ms (min) | B=16 GB/s | big weight copies in HLO |')
print('|---|---|---|---|---|---|---|---|')
for n in names:
    cells = []
    cp = ''
    for B in (1, 4, 16):
        if B in rows[n]:
            med, mn, rb, busy, copies = rows[n][B]
            flag = '*' if busy > 0.5 else ''
            cells += [f'{med:.0f} ({mn:.0f}){flag}', f'{(MB[B]+ATT)/med/1e6:.1f}']
            cp = copies
        else:
            cells += ['-', '-']
    cp = re.sub(r'region[\w.]*: |main[\w.]*: |wide[\w.]*: ', '', cp)
    cp = '; '.join(sorted(set(cp.split('; '))))[:120]
    print(f'| {n} | ' + ' | '.join(cells) + f' | {cp} |')
print('\n(*) = the machine was busy (other tenants) during that measurement; take with salt.')
