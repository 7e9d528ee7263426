// njs for nginx.conf: the Authorization value from the mounted token Secret, read per request.
//
// The Secret volume is a "..data" symlink to a timestamped directory that the kubelet swaps atomically,
// so "..data" is resolved once and both files are read from the one directory it names: the value and its
// expiry always belong to the same token. An empty result (files missing, unreadable, or the token expired)
// makes nginx.conf answer 503 instead of calling the upstream without a token.
//
// No cache: njs 0.7 (Debian 12) runs each request in a fresh VM clone, so nothing survives between
// requests; two reads from tmpfs cost microseconds. (njs >= 0.8 could keep it in a js_shared_dict_zone.)
// Never log the file contents: messages name the directory only.
import fs from 'fs';

function authorization(r) {
    const dir = r.variables.sep_token_dir || '/etc/nginx/token';
    let base = dir;
    try {
        base = fs.realpathSync(dir + '/..data');
    } catch (e) {
        // a plain directory (not a Secret volume): read the files where they are
    }
    try {
        const value = fs.readFileSync(base + '/authorization', 'utf8').trim();
        const expiresAt = Date.parse(fs.readFileSync(base + '/expires_at', 'utf8').trim());
        if (!value) {
            r.error('token Secret at ' + dir + ': the authorization key is empty');
            return '';
        }
        if (!(expiresAt > Date.now())) {
            r.error('token Secret at ' + dir + ': the token has expired (or expires_at is not RFC 3339)');
            return '';
        }
        return value;
    } catch (e) {
        r.error('token Secret at ' + dir + ' cannot be read: ' + e.code);
        return '';
    }
}

export default { authorization };
